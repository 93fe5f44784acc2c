"""The outputs layer, below everything that writes: ``atomic`` (the one atomic write, fsync),
``digests`` (size and SHA-256 of the files written, checked by readers) and ``ownership`` (the
marker of what shardtune wrote in a folder, and the rules for writing into one). It imports
nothing of shardtune but the error type, so checkpoint/, convert/, train/ and the commands all
build on it without a cycle.
"""
