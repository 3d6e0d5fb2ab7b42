"""The shipped training recipes (``*.yaml``) and their reproduction guide (``README.md``); data, no code.

Read them with :func:`pipeline.config.load_config` by name; ``python -m pipeline.reproduction`` regenerates
the guide from them.
"""
