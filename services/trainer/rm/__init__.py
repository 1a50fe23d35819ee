"""Reward-model training (`rlhf train rm`) and its data from packaged corpora
(`rlhf data sentiment-pairs`)."""
