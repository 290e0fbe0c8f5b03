"""deltagate on Ray: the engines as Ray Serve replicas behind the same gateway (serve --ray)."""
