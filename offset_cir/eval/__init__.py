"""Evaluation (SPEC section 7): ``metrics`` (pure functions on ranks), ``evaluate`` (``offset_cir.evaluate``),
``cirr_submission`` (CIRR test-server files: write and validate). Import the submodules directly."""
