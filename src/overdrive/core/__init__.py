"""The small core every other layer builds on: parallel degrees and the device mesh (`dims`), the process's
place in the job (`runtime`), the engine protocol (`engine`) and the decoder-layer finder (`layers`).

It imports torch and nothing of overdrive's training code.
"""
