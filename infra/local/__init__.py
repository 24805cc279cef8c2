"""Local development helpers: an in-process S3 server (moto) for running jobs without AWS."""
