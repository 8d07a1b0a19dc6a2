"""Operations on the system itself: schedule freshness (every job finishes within its window,
or pages) and retention."""
