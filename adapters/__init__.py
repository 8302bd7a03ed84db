"""Platform edges: each turns its platform's messages into `bot.messages.Incoming`."""
