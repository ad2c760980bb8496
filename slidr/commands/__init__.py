"""The ``slidr`` subcommands, one module per command group.

Each group module has ``cmd_<name>`` functions (parsed flags in, printed output and an
exit code out) and ``COMMANDS``: command name -> the function that adds its parser.
``slidr.cli`` assembles them; shared flag types live in ``flags``, progress printing
and signals in ``console``, fail-fast checks in ``checks``.

- ``data``: simulate, import
- ``training``: train, evaluate, score, models
- ``stack``: up, down, status
- ``stream``: worker, produce, billing, archive, archive-export, bench
- ``lifecycle``: promote, rollback, replay, retrain, monitor
- ``demo``: demo
"""
