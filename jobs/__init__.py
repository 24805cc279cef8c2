"""Ray job entry points: `python -m jobs.generate`, `python -m jobs.reflow_pairs`, `python -m jobs.encode`,
`python -m jobs.demo`."""
