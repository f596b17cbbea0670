"""Front-ends of the engine: the JSON-lines protocol, the service, stdio and HTTP servers, chat templates."""
