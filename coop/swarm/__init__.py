"""Who serves what: the DHT directory, signed announcements, route and span choice, the live view."""
