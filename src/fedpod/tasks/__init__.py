"""The internal task model and the Bitfount-style YAML front end that compiles into it."""
