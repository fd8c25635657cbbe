"""Training: the shard_map data-parallel step (`train_step`) and the loop
`train.train_and_evaluate(config, workdir)`. The top layer below the entry points.
"""
