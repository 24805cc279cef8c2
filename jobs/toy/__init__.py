"""InstaFlow's recipe reproduced offline on a procedural toy set (`instaflow-batch reproduce-toy`): the toy images
and captions (data.py), its small models (models.py), the phases run with the engine's own jobs (reproduce.py) and
the report (report.py)."""
