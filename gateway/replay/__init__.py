"""Replay: run captured (or corpus) SMTP traffic through another policy's chain.

- :mod:`gateway.replay.records` reads capture files, naming each damaged record;
- :mod:`gateway.replay.engine` plays a record through a policy's real handler and hook
  runner with a dry-run queue and DNS answered from the record;
- :mod:`gateway.replay.outcome` says what a record's transactions came to, old or new;
- :mod:`gateway.replay.report` compares and renders the differences;
- :mod:`gateway.replay.corpus` makes records from ``.eml`` files and mboxes.

See docs/replay.md.
"""
