"""The simple baseline for `hvdtrain bert`: TF-IDF + logistic regression on the same held-out split.

    .venv/bin/python bench/text_baseline.py [--data FILE.csv --text-col text --label-col label]
        [--test-fraction 0.1]

Prints accuracy and macro F1 on the rows `hvdtrain bert` holds out (the same seeded split).
"""

from __future__ import annotations

import argparse
import json

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from hvdhybrid.models.bert.data import read_labelled_csv, rotten_tomatoes
from hvdhybrid.training.data import split_indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data")
    ap.add_argument("--text-col", default="text")
    ap.add_argument("--label-col", default="label")
    ap.add_argument("--test-fraction", type=float, default=0.1)
    a = ap.parse_args()
    text = read_labelled_csv(a.data, a.text_col, a.label_col) if a.data else rotten_tomatoes()
    train, test = split_indices(len(text), a.test_fraction, seed=0)
    xs, ys = text.texts, text.labels
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train = vec.fit_transform([xs[i] for i in train.tolist()])
    x_test = vec.transform([xs[i] for i in test.tolist()])
    clf = LogisticRegression(C=4.0, max_iter=2000).fit(x_train, [ys[i] for i in train.tolist()])
    pred = clf.predict(x_test)
    y_test = [ys[i] for i in test.tolist()]
    print(json.dumps({"baseline": "tfidf-logreg", "rows_train": len(train), "rows_test": len(test),
                      "accuracy": accuracy_score(y_test, pred),
                      "f1": f1_score(y_test, pred, average="macro")}))


if __name__ == "__main__":
    main()
