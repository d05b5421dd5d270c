"""`overdrive bench`: the seed tables' comparison (HF Trainer, HF + DeepSpeed ZeRO-3, overdrive), reproducibly.

cli.py parses flags, presets.py names workloads, runner.py prepares the shared inputs and runs each cell in its
own process (hf_trainer_cell.py for the HF columns, `overdrive train` for ours), report.py writes the files.
"""
