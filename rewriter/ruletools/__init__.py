"""The public toolkit a rule author imports (built-in rules too)."""
