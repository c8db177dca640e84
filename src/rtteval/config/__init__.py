"""The study schema (each stage's settings embedded), YAML with line tracking, overrides."""
