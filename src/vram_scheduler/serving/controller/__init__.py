"""The cluster's one serving controller: its rules, its Ray actor, its HTTP API and that API's guard."""
