"""The MCP server: the characters as tools for an assistant (Claude Desktop, any MCP client).

`tools.py` builds the server from the chat service's public REST API, so both transports share one implementation:
`python -m chat_service.mcp` speaks stdio and calls a running service by URL; `http.py` mounts the streamable HTTP
transport at `/mcp` in the service itself (bearer token), where the same calls go to the app in-process.
"""
