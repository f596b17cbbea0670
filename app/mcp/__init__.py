"""MCP (Model Context Protocol) tool servers: configuration, connections, tools for the model, the check command."""
