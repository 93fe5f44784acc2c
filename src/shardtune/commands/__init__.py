"""The command layer: one module per ``shardtune`` command whose library lives elsewhere
(argument parsing, printing, exit status). ``cli.py`` dispatches to them; library modules
hold no parser and no ``main``. Commands whose package has its own ``cli.py`` (convert,
inspect, eval, plan) and ``demo`` (``demo/run.py``) are the rest of the layer.
"""
