"""Wire contract v2: the JSON objects on the bus and user tokens."""
