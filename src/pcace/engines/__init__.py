"""Where the ACE problems and the shards of a pass run: this process, or a Ray cluster."""
