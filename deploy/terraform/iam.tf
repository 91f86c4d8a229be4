# IAM roles for service accounts (IRSA): each role can be assumed only by its own
# Kubernetes service account in the medimg namespace, and grants only what that service
# needs. audit and the gateway touch no AWS API and have no role.

locals {
  oidc = replace(aws_iam_openid_connect_provider.eks.url, "https://", "")
  # service account -> (S3 prefixes it reads, writes, and deletes from). ingest deletes the
  # orphans its sweep finds, by version (medimg_ingest.objects.S3ObjectStore.discard);
  # training replaces the files of a registration that did not commit (a delete marker:
  # the bucket keeps every version; medimg_training.bundle_store.S3Bundles).
  s3_access = {
    ingest    = { read = ["instances/"], write = ["instances/"], delete = ["instances/"] }
    training  = { read = ["instances/", "models/"], write = ["models/"], delete = ["models/"] }
    inference = { read = ["models/"], write = [], delete = [] }
  }
}

data "aws_iam_policy_document" "assume" {
  for_each = local.s3_access
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [aws_iam_openid_connect_provider.eks.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc}:sub"
      values   = ["system:serviceaccount:${var.namespace}:${each.key}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "s3" {
  for_each = local.s3_access
  statement {
    sid       = "Read"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = [for prefix in each.value.read : "${aws_s3_bucket.data.arn}/${prefix}*"]
  }
  dynamic "statement" {
    for_each = length(each.value.write) > 0 ? [1] : []
    content {
      sid       = "Write"
      actions   = ["s3:PutObject"]
      resources = [for prefix in each.value.write : "${aws_s3_bucket.data.arn}/${prefix}*"]
    }
  }
  dynamic "statement" {
    for_each = length(each.value.delete) > 0 ? [1] : []
    content {
      sid       = "Delete"
      actions   = ["s3:DeleteObject", "s3:DeleteObjectVersion"]
      resources = [for prefix in each.value.delete : "${aws_s3_bucket.data.arn}/${prefix}*"]
    }
  }
  statement {
    sid       = "List"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [for prefix in distinct(concat(each.value.read, each.value.write)) : "${prefix}*"]
    }
  }
  statement {
    sid       = "Key"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.main.arn]
  }
}

resource "aws_iam_role" "service" {
  for_each           = local.s3_access
  name               = "${local.name}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.assume[each.key].json
}

resource "aws_iam_role_policy" "service" {
  for_each = local.s3_access
  name     = "s3-${each.key}"
  role     = aws_iam_role.service[each.key].id
  policy   = data.aws_iam_policy_document.s3[each.key].json
}
