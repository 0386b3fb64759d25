"""The project file, the lifecycle runner and the `init` template."""
