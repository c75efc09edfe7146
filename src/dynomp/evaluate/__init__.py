"""Evaluation: overlap (Dice, Jaccard), Jacobian statistics, similarity, time and memory."""
