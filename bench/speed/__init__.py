"""bench/throughput.py's machinery, by concern: `common` (configuration, the shared model, pairs and order),
`contenders` (TRL, madpo, the plain loop, one per subprocess) and `profiling` (`--profile`, `--micro`). bench/memory.py
reuses it through bench/throughput.py's names."""
