"""Lightning callbacks that lightning_ldm configs attach (see conf/callbacks/)."""
