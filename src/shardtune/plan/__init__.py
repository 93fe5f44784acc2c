"""``shardtune plan``: per-GPU and per-host memory, checkpoint sizes and step time of a training
run, before running it. ``shapes`` builds the model's parameters, ``estimate`` computes,
``advise`` finds the flags that make a run fit, ``report`` prints, ``cli`` parses."""
