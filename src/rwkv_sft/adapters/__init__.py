"""Parameter-efficient fine-tuning: what trains on top of a frozen base and the files it is kept in."""
