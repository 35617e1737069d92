"""The commands: each module is one short script over the library (parse first, import the stack after)."""
