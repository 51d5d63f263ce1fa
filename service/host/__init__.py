"""Host tuning: the cgroup CPU quota and memory limit, compute-thread priority, malloc settings."""
