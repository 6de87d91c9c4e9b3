import torch

from vlmtrain.eval.retrieval import recall_at_k


def test_recall_at_k_with_several_captions_per_image():
    # 3 images; captions 0,1 belong to image 0, caption 2 to image 1, caption 3 to image 2
    owners = torch.tensor([0, 0, 1, 2])
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # caption 0 -> image 0 first
            [0.3, 0.8, 0.2],  # caption 1 -> image 1 first, its image second
            [0.0, 0.7, 0.1],  # caption 2 -> image 1 first
            [0.5, 0.4, 0.3],  # caption 3 -> its image last
        ]
    )
    out = recall_at_k(scores, owners, ks=(1, 2))
    assert out["image_retrieval_recall@1"] == 0.5
    assert out["image_retrieval_recall@2"] == 0.75
    # image 0's best caption is 0 (own); image 1's is 1 (image 0's), then 2 (own); image 2's is 3 (own)
    assert abs(out["text_retrieval_recall@1"] - 2 / 3) < 1e-6
    assert out["text_retrieval_recall@2"] == 1.0
