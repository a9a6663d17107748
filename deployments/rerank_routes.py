"""The scoring routes' answers: TEI's ``/rerank`` and ``/predict``, Cohere's and Jina's ``/v1/rerank``
and ``/v2/rerank``. The routes themselves are methods of ``deployments.ingress.Ingress`` (Serve
binds a route to its replica only when the method is the ingress class's own); their schemas are
``deployments.rerank_schema``, the way a request takes ``deployments.scoring_pipeline``.
"""

from __future__ import annotations

import uuid

from fastapi.responses import Response

from deployments.http_errors import JSONBytesResponse
from deployments.rerank_schema import CohereRerankRequest, Document, PredictRequest, RerankRequest
from deployments.scoring_pipeline import ScoringPipeline


async def tei_rerank(pipeline: ScoringPipeline, body: RerankRequest) -> Response:
    """Every text, best first, with the characters that scored (``window``)."""
    _, ranked, _ = await pipeline.rerank_request(body, "rerank", raw_scores=body.raw_scores)
    return JSONBytesResponse([
        {"index": r.index, "score": r.score, **({"text": body.texts[r.index]} if body.return_text else {}),
         "window": {"start": r.start, "end": r.end}} for r in ranked])


async def cohere_rerank(pipeline: ScoringPipeline, body: CohereRerankRequest, route: str) -> Response:
    """The ``top_n`` best documents in Cohere's shape (Jina's too), with the tokens scored."""
    name, ranked, tokens = await pipeline.rerank_request(body, route)
    results = []
    for r in ranked[:body.top_n]:
        result = {"index": r.index, "relevance_score": r.score, "window": {"start": r.start, "end": r.end}}
        if body.return_documents:
            document = body.documents[r.index]
            result["document"] = {"text": document.text if isinstance(document, Document) else document}
        results.append(result)
    return JSONBytesResponse({"id": str(uuid.uuid4()), "model": name, "results": results,
                              "usage": {"total_tokens": tokens}, "meta": {"billed_units": {"search_units": 1}}})


async def tei_predict(pipeline: ScoringPipeline, body: PredictRequest) -> Response:
    """Each label's score, best first: a list for one input, a list of lists for a batch."""
    single, predictions = await pipeline.predict_request(body, "predict")
    answers = [[{"score": score, "label": label} for label, score in ranked] for ranked in predictions]
    return JSONBytesResponse(answers[0] if single else answers)
