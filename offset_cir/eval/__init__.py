"""Evaluation (docs/model.md#evaluation): ``protocols`` (the table of protocols), ``metrics`` (pure functions on
ranks and ranked lists), ``evaluate`` (``offset_cir.evaluate``; training-free rows with
``offset_cir.model.baseline``), ``gallery_cache`` (gallery features kept per model), ``cirr_submission`` and
``circo_submission`` (test-server files: write and validate). Import the submodules directly."""
