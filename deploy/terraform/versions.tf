# medimg on AWS: a VPC across three availability zones, EKS with a general and a GPU node
# group, RDS PostgreSQL (Multi-AZ, KMS), ElastiCache Redis (TLS, AUTH), S3 for instances
# and models (SSE-KMS, versioning, no public access), ECR, and IAM roles for the service
# accounts (IRSA) with least privilege. Applying it needs an AWS account; CI checks it
# statically (checkov, tests/test_deploy_checks.py) and never applies it.
terraform {
  required_version = ">= 1.6"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.80"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
    tls = {
      source  = "hashicorp/tls"
      version = "~> 4.0"
    }
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = {
      project     = "medimg"
      environment = var.environment
    }
  }
}
