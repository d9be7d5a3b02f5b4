"""The bottom layer: errors, atomic writes, memory limits, thread choice, metrics and small helpers. Imports nothing
else of ours."""
