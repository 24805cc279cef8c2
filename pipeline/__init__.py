"""Batch pipeline: plan Parquet prompt shards, read them, write and commit outputs."""
