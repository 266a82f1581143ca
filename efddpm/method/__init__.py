"""The paper's method on any noise predictor: the schedule, the inversions, editing, the manipulations, noise statistics, the 2-D toy."""
