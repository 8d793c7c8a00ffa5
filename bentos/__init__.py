"""BentoML service classes: they mount Tiffin's transports and host its runners. Nothing else."""
