"""The warehouse layer: engines, tables and aggregate queries. Imports nothing else of mlcanary."""
