"""Users' data under their control: what the agent holds about a user, shown (export), moved to
another id (merge) and erased (forget), in the streams and in every stage."""
