"""The ground floor: all-or-nothing file writing and the checks of user input; imports nothing of efddpm."""
