"""The engine: worker pool, bulkheads, executors, error handling and autoscaling."""
