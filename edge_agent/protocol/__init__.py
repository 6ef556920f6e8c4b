"""The wire contract shared by the agent and the controller: topics, messages, signed commands."""
