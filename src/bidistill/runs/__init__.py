"""The run folder: its files and layout (``rundir``), one run at a time (``lock``), what each
stage consumed (``fingerprint``, ``inputs``)."""
