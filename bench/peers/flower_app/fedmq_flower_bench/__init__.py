"""fedmq's round-time workload as a Flower app (runs only inside bench/peers/.venv-flower)."""
