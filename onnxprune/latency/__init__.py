"""Latency-aware pruning: measured per-backend latency tables and the channel counts they favour.

Start reading at `table.build_table` (what a group's layers cost at each kept count, measured on a
`backend.LatencyBackend`), then `grid.keep_counts` (the counts at the bottom of each latency step),
`predict.predicted_ms` (a pruned model's latency from the table) and `measure.measure_speedup` (the whole
model, measured). `timing.interleaved` is the one timing loop they all use; `microbench` builds the
one-node models a table times.
"""
