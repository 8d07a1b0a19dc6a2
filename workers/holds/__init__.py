"""Booking holds: expiry of one hold on request and of every due hold by a set-based sweep."""
