"""HTTP front end (aiohttp): routes, auth, the response envelope, and batching toward actors."""
