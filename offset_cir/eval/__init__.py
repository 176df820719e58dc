"""Evaluation (docs/model.md#evaluation): ``protocols`` (the table of protocols), ``metrics`` (pure functions on ranks and
ranked lists), ``evaluate`` (``offset_cir.evaluate``), ``gallery_cache`` (gallery features kept per model),
``baseline`` (training-free rows from a backbone's own features), ``cirr_submission`` and ``circo_submission``
(test-server files: write and validate). Import the submodules directly."""
