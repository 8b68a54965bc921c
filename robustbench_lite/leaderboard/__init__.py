"""The leaderboard: records (``records``), how records of one model merge (``merge``), the derived report
sections (``sections``), the registry of entries and each job's protocol and code fingerprint (``protocol``),
regeneration of what changed (``regenerate``) and the README / HTML / plot renderers (``render``)."""
